//! The event log filled in-process, as `waltap run` fills it.

use std::time::Duration;

use super::{listen, TestDb};

/// `waltap run` in-process: the log of a test database, filled from a slot made before
/// [`Log::start`] returns.
pub struct Log {
    pub slot: String,
    pub store: waltap::SourceConfig,
    cancel: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), waltap::log::append::AppendError>>,
}

impl Log {
    pub async fn start(db: &TestDb) -> Log {
        Log::start_with(db, listen::config(db, &[])).await
    }

    pub async fn start_with(db: &TestDb, listener: waltap::ListenerConfig) -> Log {
        let mut config = waltap::log::append::AppenderConfig::new(listener);
        config.max_batch_delay = Duration::from_millis(20);
        listen::prepare_slot(db, &config.listener).await;
        let cancel = tokio_util::sync::CancellationToken::new();
        Log {
            slot: config.listener.slot.clone(),
            store: config.store.clone(),
            cancel: cancel.clone(),
            task: tokio::spawn(waltap::log::append::run(config, cancel)),
        }
    }

    /// `waltap export TABLE` (the binary) from this log's source, once the pipeline has
    /// recorded the publication it reads through: the rows it prints.
    pub async fn export_rows(&self, db: &TestDb, table: &str) -> Vec<serde_json::Value> {
        let store = self.store.connect_sql().await.unwrap();
        super::wait_for(
            "the pipeline to record its publication",
            Duration::from_secs(60),
            || async {
                store
                    .query_opt(
                        "SELECT 1 FROM waltap.progress WHERE source = $1 AND publication IS NOT NULL",
                        &[&self.slot],
                    )
                    .await
                    .is_ok_and(|r| r.is_some())
            },
        )
        .await;
        let out = super::run_ok({
            let mut cmd = super::waltap(&db.url(), &["export", table]);
            cmd.args(["--slot", &self.slot]);
            cmd
        })
        .await;
        out.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l["action"] == "snapshot")
            .map(|l| l["row"].clone())
            .collect()
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
    }
}
