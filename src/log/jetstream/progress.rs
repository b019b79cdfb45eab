//! The progress bucket beside a JetStream log (`<stream>_progress`): what a writer records
//! of its source besides events, one key each (`<slot>.publication`, `<slot>.watermark`),
//! and the writer's side of recording it. Readers look values up by [`Recorded`].

use async_nats::jetstream::context::Context;
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::{Config as StreamConfig, DiscardPolicy, StorageType};
use bytes::Bytes;

use super::{JetStreamConfig, JetStreamError, JetStreamLog};
use crate::lsn::LogMark;

/// What a writer records of its source in the progress bucket, one key each.
#[derive(Debug, Clone, Copy)]
pub(super) enum Recorded {
    /// The source's publication.
    Publication,
    /// The last watermark that passed while no message followed it (a [`LogMark`]).
    Watermark,
}

impl Recorded {
    /// The key for `source` (a slot name, which is a valid key).
    pub(super) fn of(self, source: &str) -> String {
        let what = match self {
            Recorded::Publication => "publication",
            Recorded::Watermark => "watermark",
        };
        format!("{source}.{what}")
    }
}

/// The progress bucket of `config`'s stream, made when missing (one value per key, as
/// many replicas as the stream). Its stream is made here with a key-value bucket's layout
/// rather than by the client's bucket creation, which asks for the account's limits in a
/// form servers before 2.10 do not answer in.
pub(super) async fn progress_bucket(
    js: &Context,
    config: &JetStreamConfig,
) -> Result<kv::Store, JetStreamError> {
    let request = |operation| config.request_error(operation);
    let bucket = config.progress_bucket();
    js.get_or_create_stream(StreamConfig {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_bytes: -1,
        max_message_size: -1,
        storage: StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: config.replicas,
        discard: DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .map_err(|e| request("make the progress bucket")(e.into()))?;
    js.get_key_value(bucket)
        .await
        .map_err(|e| request("open the progress bucket")(e.into()))
}

impl JetStreamLog {
    /// Records the source's publication, which initial states read: only what it
    /// publishes is copied.
    pub async fn record_publication(&mut self, publication: &str) -> Result<(), JetStreamError> {
        self.record(Recorded::Publication, publication.to_owned())
            .await
    }

    pub(super) async fn record_mark(&mut self, mark: LogMark) -> Result<(), JetStreamError> {
        self.record(Recorded::Watermark, mark.lsn().to_string())
            .await?;
        self.marked = mark;
        Ok(())
    }

    async fn record(&mut self, key: Recorded, value: String) -> Result<(), JetStreamError> {
        let store = match &self.recorded {
            Some(store) => store,
            None => self
                .recorded
                .insert(progress_bucket(&self.js, &self.config).await?),
        };
        store
            .put(key.of(&self.source), Bytes::from(value))
            .await
            .map_err(|e| self.config.request_error("write to the progress bucket")(e.into()))?;
        Ok(())
    }
}
