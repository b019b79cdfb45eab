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

    pub async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
    }
}
