//! The `waltap run` / `waltap serve` process that fills the event log (real processes of
//! the built binary, killed and stopped by the schedule), and the commands the schedule
//! runs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support;

/// The one key of the chaos server: every table, streams.
pub const KEY: &str = "chaos-key-0123";
const KEYS: &str = r#"key = [{secret = "chaos-key-0123", tables = ["*"], streams = true}]"#;

/// Names and settings every command of one schedule shares.
#[derive(Clone)]
pub struct Env {
    pub url: String,
    pub slot: String,
    pub publication: String,
    /// `--retention-age`, in seconds: short, so that paused consumers go stale.
    pub retention_secs: u64,
    /// Group mode: more `serve` members besides the pipeline, with a short takeover timeout.
    pub group: bool,
}

impl Env {
    /// `waltap ARGS` against this schedule's database, slot and publication.
    pub fn waltap(&self, args: &[&str]) -> Command {
        let mut cmd = support::waltap(&self.url, args);
        cmd.env("WALTAP_SLOT", &self.slot)
            .env("WALTAP_PUBLICATION", &self.publication)
            .env("WALTAP_API_KEYS", KEYS)
            .env_remove("WALTAP_KEYS_FILE");
        if self.group {
            cmd.env("WALTAP_TAKEOVER_TIMEOUT", super::group::TAKEOVER_TIMEOUT);
        }
        cmd
    }

    /// `waltap run` or `waltap serve` (on a port of its own) filling the log, with the
    /// schedule's retention.
    pub fn pipeline(&self, kind: Kind) -> Command {
        let retention = format!("{}s", self.retention_secs);
        let mut args = vec![
            "--table",
            "items",
            "--retention-age",
            &retention,
            "--retention-interval",
            "1s",
        ];
        let sub = match kind {
            Kind::Run => "run",
            Kind::Serve => {
                args.extend(["--listen", "127.0.0.1:0"]);
                "serve"
            }
        };
        let mut all = vec![sub];
        all.extend(args);
        let mut cmd = self.waltap(&all);
        cmd.stdout(std::process::Stdio::null());
        cmd
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Run,
    Serve,
}

/// The pipeline process, whichever kind runs now.
pub struct Pipeline {
    env: Env,
    pub kind: Kind,
    child: Child,
    /// The HTTP base URL while a `serve` is up.
    pub http: Arc<Mutex<Option<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    stopped: bool,
}

impl Pipeline {
    pub async fn start(env: &Env, kind: Kind, http: Arc<Mutex<Option<String>>>) -> Pipeline {
        let mut child = env.pipeline(kind).spawn().unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (sink, http_slot) = (stderr.clone(), http.clone());
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    *http_slot.lock().unwrap() = Some(format!("http://{addr}"));
                }
                sink.lock().unwrap().push(line);
            }
        });
        Pipeline {
            env: env.clone(),
            kind,
            child,
            http,
            stderr,
            stopped: false,
        }
    }

    /// Why it ended by itself (with its stderr), if it did.
    pub fn exited(&mut self) -> Option<String> {
        let status = self.child.try_wait().unwrap()?;
        Some(format!(
            "waltap {:?} exited by itself ({status}); stderr:\n{}",
            self.kind,
            self.stderr.lock().unwrap().join("\n")
        ))
    }

    /// SIGKILL, then a new process of `kind`.
    pub async fn kill_and_restart(&mut self, kind: Kind, down: Duration) {
        *self.http.lock().unwrap() = None;
        let _ = self.child.start_kill();
        self.child.wait().await.unwrap();
        tokio::time::sleep(down).await;
        *self = Pipeline::start(&self.env, kind, self.http.clone()).await;
    }

    /// SIGSTOP: the process freezes with its connections open.
    pub fn pause(&mut self) {
        if self.exited().is_none() {
            support::signal(&self.child, "STOP");
            self.stopped = true;
        }
    }

    pub fn resume(&mut self) {
        if self.stopped && self.child.id().is_some() {
            support::signal(&self.child, "CONT");
            self.stopped = false;
        }
    }

    pub async fn shutdown(mut self) {
        self.resume();
        if self.exited().is_some() {
            return;
        }
        support::sigterm(&self.child);
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

/// Runs `waltap ARGS`; its stdout, or the stderr it failed with (or that it hung).
pub async fn run(env: &Env, args: &[&str]) -> Result<String, String> {
    // Generous: an export waits for the log to pass its watermark, which takes a while
    // after SIGKILLs on a loaded machine.
    let limit = Duration::from_secs(180);
    let out = match tokio::time::timeout(limit, env.waltap(args).output()).await {
        Ok(out) => out.unwrap(),
        Err(_) => return Err(format!("waltap {args:?} did not finish within {limit:?}")),
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
