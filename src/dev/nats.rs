//! Throwaway `nats-server` processes with JetStream on, for tests and benchmarks: one
//! server, or a cluster of several on loopback, each storing in a directory of its own.
//! Servers are killed with SIGKILL (and can be started again on the same ports and
//! storage), so tests can crash them for real.
//!
//! The binary is `$WALTAP_NATS_SERVER`, else `nats-server` on the PATH or in `/usr/sbin`
//! (Debian's package).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starting or reaching a server failed.
#[derive(Debug, thiserror::Error)]
pub enum NatsServerError {
    /// No `nats-server` binary was found.
    #[error(
        "nats-server not found (install Debian's nats-server package, or set WALTAP_NATS_SERVER)"
    )]
    NotFound,
    /// The process could not be started, or a file not written.
    #[error("nats-server: cannot {what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The server did not get ready in time.
    #[error("nats-server {name} did not get ready within {waited:?}; its log:\n{log}")]
    NotReady {
        /// The server's name.
        name: String,
        /// How long it was waited for.
        waited: Duration,
        /// The end of its log file.
        log: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NatsServerError {
    let what = what.into();
    move |source| NatsServerError::Io { what, source }
}

/// The `nats-server` binary, if there is one.
pub fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("WALTAP_NATS_SERVER") {
        return Some(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("nats-server"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let debian = PathBuf::from("/usr/sbin/nats-server");
        debian.is_file().then_some(debian)
    })
}

fn free_port() -> Result<u16, NatsServerError> {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io("find a free port"))
}

/// One running (or killed) server.
pub struct NatsServer {
    name: String,
    binary: PathBuf,
    port: u16,
    cluster: Option<(u16, Vec<u16>)>,
    dir: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts one server with JetStream, storing under `dir`, and waits until it is ready.
    pub async fn start(dir: &Path) -> Result<NatsServer, NatsServerError> {
        let binary = binary().ok_or(NatsServerError::NotFound)?;
        let mut server = NatsServer {
            name: "waltap-test".into(),
            binary,
            port: free_port()?,
            cluster: None,
            dir: dir.to_owned(),
            child: None,
        };
        server.spawn()?;
        server.wait_ready().await?;
        Ok(server)
    }

    /// Starts a JetStream cluster of `n` servers on loopback, each storing under a
    /// directory of `dir`, and waits until it has elected its metadata leader.
    pub async fn start_cluster(dir: &Path, n: usize) -> Result<Vec<NatsServer>, NatsServerError> {
        let binary = binary().ok_or(NatsServerError::NotFound)?;
        let routes = (0..n).map(|_| free_port()).collect::<Result<Vec<_>, _>>()?;
        let mut servers = Vec::with_capacity(n);
        for (i, route) in routes.iter().enumerate() {
            let mut server = NatsServer {
                name: format!("waltap-n{i}"),
                binary: binary.clone(),
                port: free_port()?,
                cluster: Some((*route, routes.clone())),
                dir: dir.join(format!("n{i}")),
                child: None,
            };
            server.spawn()?;
            servers.push(server);
        }
        for server in &servers {
            server.wait_ready().await?;
        }
        Ok(servers)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn spawn(&mut self) -> Result<(), NatsServerError> {
        std::fs::create_dir_all(&self.dir).map_err(io(format!("create {}", self.dir.display())))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-js")
            .arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-n")
            .arg(&self.name)
            .arg("-sd")
            .arg(self.dir.join("store"))
            .arg("-l")
            .arg(self.log_path());
        if let Some((port, routes)) = &self.cluster {
            let routes: Vec<String> = routes
                .iter()
                .filter(|r| *r != port)
                .map(|r| format!("nats://127.0.0.1:{r}"))
                .collect();
            cmd.arg("--cluster_name")
                .arg("waltap")
                .arg("--cluster")
                .arg(format!("nats://127.0.0.1:{port}"))
                .arg("--routes")
                .arg(routes.join(","));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io(format!("start {}", self.binary.display())))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until a client can connect and JetStream answers.
    pub async fn wait_ready(&self) -> Result<(), NatsServerError> {
        let limit = Duration::from_secs(30);
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(client) = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(1))
                .connect(self.url())
                .await
            {
                // JetStream is up (in a cluster: has a metadata leader) once it answers a
                // stream lookup, if only with "not found". (Account info is no probe: this
                // client cannot parse nats-server 2.9's answer.)
                let js = async_nats::jetstream::new(client);
                match js.get_stream("WALTAP_READY_PROBE").await {
                    Ok(_) => return Ok(()),
                    Err(e) => {
                        if let async_nats::jetstream::context::GetStreamErrorKind::JetStream(j) =
                            e.kind()
                        {
                            if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
                            {
                                return Ok(());
                            }
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(NatsServerError::NotReady {
            name: self.name.clone(),
            waited: limit,
            log: self.log_tail(),
        })
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The client address.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILL, and waits for the process to end.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports and storage (after [`NatsServer::kill`]),
    /// without waiting for it: a cluster member needs its peers to be ready.
    pub fn restart(&mut self) -> Result<(), NatsServerError> {
        self.kill();
        self.spawn()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
