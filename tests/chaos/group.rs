//! Group mode: besides the pipeline, one or two more `waltap serve` members on the same
//! slot and store. Whichever leads (by `/healthz`'s `role`) is SIGKILLed (and replaced) or
//! SIGSTOPped, longer than the takeover timeout now and then; the log must still hold
//! every committed change once, in order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use super::procs::{Env, Kind};
use crate::support;

/// The members' takeover timeout (`WALTAP_TAKEOVER_TIMEOUT`, the pipeline's too).
pub const TAKEOVER_TIMEOUT: &str = "3s";

struct Member {
    child: Child,
    url: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

/// The members besides the pipeline.
pub struct Members {
    env: Env,
    members: Vec<Member>,
    /// The members' URLs for consumers: a member's leaves before it is killed.
    urls: Arc<Mutex<Vec<String>>>,
}

impl Members {
    pub async fn start(env: &Env, n: usize, urls: Arc<Mutex<Vec<String>>>) -> Members {
        let mut members = Vec::new();
        for _ in 0..n {
            let m = spawn(env).await;
            urls.lock().unwrap().push(m.url.clone());
            members.push(m);
        }
        Members {
            env: env.clone(),
            members,
            urls,
        }
    }

    /// Why a member ended by itself (with its stderr), if one did.
    pub fn exited(&mut self) -> Option<String> {
        self.members.iter_mut().enumerate().find_map(|(i, m)| {
            let status = m.child.try_wait().unwrap()?;
            Some(format!(
                "group member {i} (waltap serve) exited by itself ({status}); stderr:\n{}",
                m.stderr.lock().unwrap().join("\n")
            ))
        })
    }

    /// The member that leads, if one of them says so.
    pub async fn leader(&self) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if support::healthz_role(&m.url).await.as_deref() == Some("leader") {
                return Some(i);
            }
        }
        None
    }

    /// SIGKILL member `i`, and a new member after `down`.
    pub async fn kill(&mut self, i: usize, down: Duration) {
        let m = &mut self.members[i];
        self.urls.lock().unwrap().retain(|u| *u != m.url);
        let _ = m.child.start_kill();
        m.child.wait().await.unwrap();
        tokio::time::sleep(down).await;
        self.members[i] = spawn(&self.env).await;
        self.urls.lock().unwrap().push(self.members[i].url.clone());
    }

    /// SIGSTOP member `i` for `frozen`.
    pub async fn pause(&mut self, i: usize, frozen: Duration) {
        if self.exited().is_some() {
            return;
        }
        support::signal(&self.members[i].child, "STOP");
        tokio::time::sleep(frozen).await;
        support::signal(&self.members[i].child, "CONT");
    }

    pub async fn shutdown(mut self) {
        for m in &mut self.members {
            if m.child.try_wait().unwrap().is_none() {
                support::sigterm(&m.child);
            }
        }
        for m in &mut self.members {
            let _ = tokio::time::timeout(Duration::from_secs(30), m.child.wait()).await;
        }
    }
}

/// A `waltap serve` member, once it listens.
async fn spawn(env: &Env) -> Member {
    let mut child = env.pipeline(Kind::Serve).spawn().unwrap();
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(90), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(addr) = line.strip_prefix("listening on ") {
                return Some(format!("http://{addr}"));
            }
            stderr.lock().unwrap().push(line);
        }
        None
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        panic!(
            "a group member did not listen; stderr:\n{}",
            stderr.lock().unwrap().join("\n")
        )
    });
    let sink = stderr.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    Member { child, url, stderr }
}
