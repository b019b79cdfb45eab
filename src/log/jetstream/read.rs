//! Reading the JetStream log for waltap's own named streams: where a position is in the
//! stream, following it from there, and counting what is left.
//!
//! Invariants:
//!
//! - positions grow with sequences (the writer publishes in commit order), so finding the
//!   first message after a position is a binary search over sequences;
//! - never a silent skip: the stream's limits discard from the front, so a follower that
//!   finds its next message at a later sequence than it expected (or starts on the
//!   stream's first message) reads that message's [`PREVIOUS_HEADER`] and reports the gap
//!   as the last position it misses; the stream reader turns a gap past its cursor into
//!   `stale_cursor`. A gap whose extent is unknown (a message without the header) is
//!   reported as reaching up to that message;
//! - a follower never waits for the server inside [`Follower::page`] unless the server
//!   said more is stored; waiting for new messages is [`Follower::wait`]'s alone.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::{Config as PullConfig, Ordered, OrderedConfig};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::Context;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream as JsStream};
use futures::StreamExt;
use tokio::sync::OnceCell;

use super::{
    subject_token, JetStreamConfig, JetStreamError, POSITION_HEADER, PREVIOUS_HEADER,
    PREVIOUS_NONE, SCHEMA_CHANGE_HEADER, SOURCE_HEADER, TX_LAST_HEADER,
};
use crate::event::{Position, TableName};
use crate::log::streams::Mark;
use crate::log::{StoreError, Stored};
use crate::lsn::{LogMark, Lsn};

/// How long [`Follower::page`] waits for a message the server said it holds before it
/// takes the follower as caught up (the message was discarded meanwhile).
const PENDING_WAIT: Duration = Duration::from_secs(2);
/// How long an ephemeral consumer made to count a backlog outlives a failed delete.
const COUNT_CONSUMER_TTL: Duration = Duration::from_secs(30);

/// A process's reading side of the JetStream log of one source; cheap to clone. It
/// connects on first use (and again after a failed attempt), so a server starts while
/// NATS is unreachable and its stream requests fail with the reason until it is back.
#[derive(Clone)]
pub struct JetStreamReader {
    connected: Arc<OnceCell<(Context, JsStream)>>,
    /// The progress bucket, looked up (or made) on first use.
    bucket: Arc<OnceCell<async_nats::jetstream::kv::Store>>,
    config: JetStreamConfig,
    source: String,
    /// Where recent pages ended: a consumer that opens again at the cursor a page gave
    /// (a feed client's next request) finds its sequence here instead of by a search.
    ends: Arc<Mutex<VecDeque<(Mark, u64)>>>,
}

/// Page ends remembered per reader: about one per consumer reading at once.
const REMEMBERED_ENDS: usize = 256;

/// Whether a stored message is the last of its transaction.
fn ends_tx(m: &StreamMessage) -> bool {
    m.headers.get(TX_LAST_HEADER).is_some()
}

impl std::fmt::Debug for JetStreamReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamReader")
            .field("config", &self.config)
            .field("source", &self.source)
            .finish()
    }
}

impl JetStreamReader {
    /// A reader of the events of `source` in `config`'s stream; connects on first use.
    pub fn new(config: &JetStreamConfig, source: &str) -> JetStreamReader {
        JetStreamReader {
            connected: Arc::new(OnceCell::new()),
            bucket: Arc::new(OnceCell::new()),
            config: config.clone(),
            source: source.to_owned(),
            ends: Arc::new(Mutex::new(VecDeque::with_capacity(REMEMBERED_ENDS))),
        }
    }

    fn ends(&self) -> std::sync::MutexGuard<'_, VecDeque<(Mark, u64)>> {
        // Plain values, and nothing panics while the lock is held.
        self.ends.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers that the message at `sequence` is at `at`.
    fn remember_end(&self, at: Mark, sequence: u64) {
        let mut ends = self.ends();
        if ends.len() == REMEMBERED_ENDS {
            ends.pop_front();
        }
        ends.push_back((at, sequence));
    }

    /// The connection and the stream, connecting and looking it up first if needed
    /// (creating it when missing, as the writer would: a server may start before anything
    /// was appended).
    async fn connected(&self) -> Result<&(Context, JsStream), StoreError> {
        Ok(self
            .connected
            .get_or_try_init(|| async {
                let name = format!("waltap reader {}", self.source);
                let js = super::connect(&self.config, &name).await?;
                let stream = super::ensure_stream(&js, &self.config).await?;
                Ok::<_, super::JetStreamError>((js, stream))
            })
            .await?)
    }

    async fn stream(&self) -> Result<&JsStream, StoreError> {
        Ok(&self.connected().await?.1)
    }

    /// The source (slot) whose events the stream holds.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// What the writer recorded of the source under `key` in the progress bucket.
    async fn recorded(&self, key: super::progress::Recorded) -> Result<Option<String>, StoreError> {
        let store = self
            .bucket
            .get_or_try_init(|| async {
                let js = &self.connected().await?.0;
                Ok::<_, StoreError>(super::progress::progress_bucket(js, &self.config).await?)
            })
            .await?;
        let value = store
            .get(key.of(&self.source))
            .await
            .map_err(|e| self.request("read the progress bucket")(e.into()))?;
        Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The source's publication as its writer recorded it (`None` before a writer ran).
    pub(crate) async fn publication(&self) -> Result<Option<String>, StoreError> {
        self.recorded(super::progress::Recorded::Publication).await
    }

    /// The last watermark mark the writer recorded for the source (see the module
    /// [`super`]), if any.
    pub(crate) async fn watermark_mark(&self) -> Result<Option<LogMark>, StoreError> {
        let Some(text) = self.recorded(super::progress::Recorded::Watermark).await? else {
            return Ok(None);
        };
        let lsn: Lsn =
            text.parse()
                .map_err(|e: crate::lsn::ParseLsnError| StoreError::Corrupt {
                    position: format!("watermark mark of source {:?}", self.source),
                    message: e.to_string(),
                })?;
        Ok(Some(LogMark::from_stored(lsn)))
    }

    fn request(
        &self,
        operation: &'static str,
    ) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> StoreError + '_ {
        move |e| StoreError::JetStream(self.config.request_error(operation)(e))
    }

    /// Refuses a named stream of another source: this log holds one source's events.
    pub(crate) fn check_source(&self, source: &str) -> Result<(), StoreError> {
        if source == self.source {
            return Ok(());
        }
        Err(StoreError::JetStream(JetStreamError::OtherSource {
            stream: self.config.stream.clone(),
            holds: self.source.clone(),
            wanted: source.to_owned(),
        }))
    }

    /// The first and last sequence the stream holds now (first > last when it is empty).
    async fn bounds(&self) -> Result<(u64, u64), StoreError> {
        let mut stream = self.stream().await?.clone();
        let info = stream
            .info()
            .await
            .map_err(|e| self.request("read the state")(e.into()))?;
        Ok((info.state.first_sequence, info.state.last_sequence))
    }

    /// The first message at or after `sequence`, if any.
    async fn message_from(&self, sequence: u64) -> Result<Option<StreamMessage>, StoreError> {
        let all = self.config.subjects();
        let stream = self.stream().await?;
        match stream
            .get_first_raw_message_by_subject(&all, sequence)
            .await
        {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(self.request("read a message")(e.into())),
        }
    }

    fn position(&self, m: &StreamMessage) -> Result<Position, StoreError> {
        super::JetStreamLog::position_of(&self.config, &self.source, m).map_err(StoreError::from)
    }

    /// Where the log ends: after its last message, or before everything while it is
    /// empty. Inside a transaction (a writer crashed in the middle of one), the mark
    /// stands after the last message, so the rest of that transaction still comes.
    /// `None` when the stream's limits discarded every message: the stream no longer
    /// says where it ended.
    pub(crate) async fn head(&self) -> Result<Option<Mark>, StoreError> {
        let (_, last) = self.bounds().await?;
        if last == 0 {
            return Ok(Some(Mark { lsn: 0, ordinal: 0 }));
        }
        let Some(m) = self.message_from(last).await? else {
            return Ok(None);
        };
        let at = Mark::of(self.position(&m)?);
        Ok(Some(if ends_tx(&m) {
            Mark {
                lsn: at.lsn,
                ordinal: crate::log::streams::TX_END,
            }
        } else {
            at
        }))
    }

    /// The first sequence whose message (or, for a sequence without one, the next message
    /// after it) lies after `after`; the last sequence + 1 when there is none yet.
    /// Starting a consumer at a sequence without a message starts it at the next one.
    async fn seek(&self, after: Mark) -> Result<u64, StoreError> {
        Ok(self.seek_noting(after).await?.0)
    }

    /// [`JetStreamReader::seek`], with the message just before the sequence found when the
    /// search read it: its mark, and whether it ends its transaction.
    async fn seek_noting(&self, after: Mark) -> Result<(u64, Option<(Mark, bool)>), StoreError> {
        let remembered = self
            .ends()
            .iter()
            .rev()
            .find(|(at, _)| *at == after)
            .map(|e| e.1);
        // Only a hint: the stream may have been purged or made again since.
        if let Some(sequence) = remembered {
            if let Some(before) = self.message_at(sequence).await? {
                if before.0 == after {
                    return Ok((sequence + 1, Some(before)));
                }
            }
        }
        let (first, last) = self.bounds().await?;
        let (mut lo, mut hi) = (first.max(1), last + 1);
        // The message at `lo - 1` once `lo` moved: the last one found at or before `after`.
        let mut before = None;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.message_from(mid).await? {
                Some(m) => {
                    let at = Mark::of(self.position(&m)?);
                    if at <= after {
                        lo = m.sequence + 1;
                        before = Some((at, ends_tx(&m)));
                    } else {
                        hi = mid;
                    }
                }
                None => hi = mid,
            }
        }
        Ok((lo, before))
    }

    /// A follower of the messages after `after`, handing out the bodies of `tables` only.
    pub(crate) async fn follow(
        &self,
        after: Mark,
        tables: &[TableName],
    ) -> Result<Follower, StoreError> {
        let (start, before) = self.seek_noting(after).await?;
        let prefixes = tables.iter().map(|t| self.table_prefix(t)).collect();
        self.follow_at(start, prefixes, before.is_some()).await
    }

    /// A follower for a consumer whose cursor is `cursor`, and the mark it reads after: the
    /// cursor itself when its message ends its transaction (or the cursor is a
    /// transaction's end), else the start of the cursor's transaction, which the consumer
    /// reads again for its numbering.
    pub(crate) async fn follow_resuming(
        &self,
        cursor: Mark,
        tables: &[TableName],
    ) -> Result<(Follower, Mark), StoreError> {
        let prefixes = tables.iter().map(|t| self.table_prefix(t)).collect();
        let (start, before) = self.seek_noting(cursor).await?;
        let tx_start =
            cursor.read_after(before.is_some_and(|(at, tx_last)| at == cursor && tx_last));
        if tx_start == cursor {
            let follower = self.follow_at(start, prefixes, before.is_some()).await?;
            return Ok((follower, cursor));
        }
        // The transaction's messages are consecutive and numbered from 0, so its first is
        // usually `ordinal` sequences before the cursor's; another seek when it is not
        // there (the stream's limits discarded it, or the cursor's message is gone).
        let first = Mark {
            lsn: cursor.lsn,
            ordinal: 0,
        };
        let guess = u64::try_from(cursor.ordinal)
            .ok()
            .and_then(|ordinal| (start - 1).checked_sub(ordinal))
            .filter(|s| *s > 0);
        let follower = match guess {
            Some(s) if self.message_at(s).await?.is_some_and(|at| at.0 == first) => {
                self.follow_at(s, prefixes, false).await?
            }
            _ => {
                let (start, before) = self.seek_noting(tx_start).await?;
                self.follow_at(start, prefixes, before.is_some()).await?
            }
        };
        Ok((follower, tx_start))
    }

    /// The position of the message at exactly `sequence`, and whether it ends its
    /// transaction; `None` when the stream does not hold that sequence.
    async fn message_at(&self, sequence: u64) -> Result<Option<(Mark, bool)>, StoreError> {
        match self.message_from(sequence).await? {
            Some(m) if m.sequence == sequence => {
                Ok(Some((Mark::of(self.position(&m)?), ends_tx(&m))))
            }
            _ => Ok(None),
        }
    }

    /// The transactions that end in the last `count` messages at or before `through`, as
    /// `(xid, commit LSN)`, newest first.
    pub(crate) async fn commits_before(
        &self,
        through: Mark,
        count: u64,
    ) -> Result<Vec<(u32, Lsn)>, StoreError> {
        let end = self.seek(through).await?;
        let (first, _) = self.bounds().await?;
        let start = end.saturating_sub(count).max(first).max(1);
        let mut commits = Vec::new();
        if start >= end {
            return Ok(commits);
        }
        let mut follower = self
            .follow_at(
                start,
                vec![format!("{}.", self.config.subject_prefix)],
                false,
            )
            .await?;
        'read: loop {
            let page = follower.page(1024, None).await?;
            if page.events.is_empty() {
                follower.check_read_all()?;
                break;
            }
            for stored in page.events {
                if stored.at > through {
                    break 'read;
                }
                if let (true, Some(body)) = (stored.tx_last, &stored.body) {
                    commits.push((xid_of(body, stored.at)?, Lsn(stored.at.lsn as u64)));
                }
            }
        }
        commits.reverse();
        Ok(commits)
    }

    /// A follower from sequence `start` on, handing out the bodies of subjects that start
    /// with one of `prefixes`.
    ///
    /// `held_before`: the caller just read the message before `start` (it is stored).
    async fn follow_at(
        &self,
        start: u64,
        prefixes: Vec<String>,
        held_before: bool,
    ) -> Result<Follower, StoreError> {
        let (_, last) = self.bounds().await?;
        // When the message before the start is still stored, nothing before the start can
        // be missing; otherwise the first message read says what is.
        let contiguous = start == 1
            || held_before
            || matches!(self.message_from(start - 1).await?, Some(m) if m.sequence == start - 1);
        let consumer = self
            .stream()
            .await?
            .create_consumer(OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| self.request("make a consumer")(e.into()))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| self.request("read messages")(e.into()))?;
        Ok(Follower {
            messages,
            reader: self.clone(),
            next: start,
            pending: (last + 1).saturating_sub(start),
            stored_at_start: last,
            peeked: None,
            contiguous,
            prefixes,
        })
    }

    /// `<prefix>.<schema>.<table>.`: the start of every subject of the table's events.
    fn table_prefix(&self, t: &TableName) -> String {
        let mut s = String::with_capacity(self.config.subject_prefix.len() + 32);
        s.push_str(&self.config.subject_prefix);
        s.push('.');
        subject_token(&t.schema, &mut s);
        s.push('.');
        subject_token(&t.table, &mut s);
        s.push('.');
        s
    }

    /// The messages of `tables` after `after`, counted up to `limit + 1`.
    pub(crate) async fn count(
        &self,
        after: Mark,
        tables: &[TableName],
        limit: i64,
    ) -> Result<i64, StoreError> {
        let start = self.seek(after).await?;
        let mut total = 0i64;
        for t in tables {
            let mut consumer = self
                .stream()
                .await?
                .create_consumer(PullConfig {
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: start,
                    },
                    ack_policy: AckPolicy::None,
                    filter_subject: format!("{}*", self.table_prefix(t)),
                    inactive_threshold: COUNT_CONSUMER_TTL,
                    ..Default::default()
                })
                .await
                .map_err(|e| self.request("make a consumer")(e.into()))?;
            let info = consumer
                .info()
                .await
                .map_err(|e| self.request("count messages")(e.into()))?;
            total += i64::try_from(info.num_pending).unwrap_or(i64::MAX);
            let name = info.name.clone();
            if let Err(e) = self.stream().await?.delete_consumer(&name).await {
                tracing::debug!(error = %e, consumer = %name, "cannot delete a counting consumer; it expires by itself");
            }
            if total > limit {
                break;
            }
        }
        Ok(total.min(limit + 1))
    }
}

/// The transaction id (`tx.id`) of the event stored at `at` as `body`.
pub(crate) fn xid_of(body: &str, at: Mark) -> Result<u32, StoreError> {
    #[derive(serde::Deserialize)]
    struct Tx {
        id: u32,
    }
    #[derive(serde::Deserialize)]
    struct Event {
        tx: Tx,
    }
    serde_json::from_str::<Event>(body)
        .map(|e| e.tx.id)
        .map_err(|e| StoreError::Corrupt {
            position: at.position().to_string(),
            message: format!("no transaction id: {e}"),
        })
}

/// A reader's position in the stream: the messages after it, in order, one page at a time.
pub(crate) struct Follower {
    messages: Ordered,
    reader: JetStreamReader,
    /// The sequence the next message should have.
    next: u64,
    /// Messages the server holds after the last one read.
    pending: u64,
    /// The stream's last sequence when the follower started.
    stored_at_start: u64,
    peeked: Option<async_nats::jetstream::Message>,
    /// The message before `next` was read (or there is none): no gap can hide before it.
    contiguous: bool,
    prefixes: Vec<String>,
}

/// A page of the log: its events, and the last position of a gap before them, if the
/// stream's limits discarded messages there.
pub(crate) struct Page {
    pub(crate) events: Vec<Stored>,
    pub(crate) gap_through: Option<Mark>,
}

impl Follower {
    /// Up to `limit` messages read now (for `within`, the rest of that transaction
    /// whatever its size); none when caught up.
    pub(crate) async fn page(
        &mut self,
        limit: usize,
        within: Option<i64>,
    ) -> Result<Page, StoreError> {
        let mut page = Page {
            events: Vec::new(),
            gap_through: None,
        };
        loop {
            if within.is_none() && page.events.len() >= limit {
                break;
            }
            let message = match self.peeked.take() {
                Some(m) => m,
                None if self.pending == 0 => break,
                None => match tokio::time::timeout(PENDING_WAIT, self.messages.next()).await {
                    Ok(Some(Ok(m))) => m,
                    Ok(Some(Err(e))) => return Err(self.reader.request("read messages")(e.into())),
                    Ok(None) => {
                        return Err(self.reader.request("read messages")(
                            "the consumer ended".into(),
                        ))
                    }
                    Err(_) => {
                        self.pending = 0;
                        break;
                    }
                },
            };
            let info = message
                .info()
                .map_err(|e| self.reader.request("read a message's sequence")(e))?;
            let (sequence, pending) = (info.stream_sequence, info.pending);
            let at = Mark::of(
                self.header_position(&message, POSITION_HEADER)?
                    .ok_or_else(|| StoreError::Corrupt {
                        position: format!("JetStream message {sequence}"),
                        message: format!("no {POSITION_HEADER} header"),
                    })?,
            );
            if let Some(lsn) = within {
                if at.lsn != lsn {
                    self.peeked = Some(message);
                    break;
                }
            }
            if sequence != self.next || !self.contiguous {
                if let Some(through) = self.gap(&message, sequence, at)? {
                    page.gap_through = page.gap_through.max(Some(through));
                }
            }
            self.next = sequence + 1;
            self.pending = pending;
            self.contiguous = true;
            let headers = message.headers.as_ref();
            let tx_last = headers.and_then(|h| h.get(TX_LAST_HEADER)).is_some();
            let subject = message.subject.as_str();
            let body = if self
                .prefixes
                .iter()
                .any(|p| subject.starts_with(p.as_str()))
            {
                let mut text = String::from_utf8(message.payload.to_vec()).map_err(|e| {
                    StoreError::Corrupt {
                        position: at.position().to_string(),
                        message: e.to_string(),
                    }
                })?;
                if let Some(change) = headers.and_then(|h| h.get(SCHEMA_CHANGE_HEADER)) {
                    crate::event::splice_stored(&mut text, change.as_str());
                }
                Some(text)
            } else {
                None
            };
            page.events.push(Stored { at, tx_last, body });
            if within.is_some() && tx_last {
                break;
            }
        }
        if let Some(last) = page.events.last() {
            self.reader.remember_end(last.at, self.next - 1);
        }
        Ok(page)
    }

    /// What a jump to `sequence` (or a start after a discarded message) skipped: the last
    /// position before `at` that is gone, or `None` when nothing is.
    fn gap(
        &self,
        message: &async_nats::jetstream::Message,
        sequence: u64,
        at: Mark,
    ) -> Result<Option<Mark>, StoreError> {
        let previous = message
            .headers
            .as_ref()
            .and_then(|h| h.get(PREVIOUS_HEADER))
            .map(|v| v.as_str().to_owned());
        Ok(match previous.as_deref() {
            Some(PREVIOUS_NONE) => None,
            Some(text) => Some(Mark::of(text.parse().map_err(
                |e: crate::event::ParsePositionError| StoreError::Corrupt {
                    position: format!("JetStream message {sequence}"),
                    message: format!("{PREVIOUS_HEADER}: {e}"),
                },
            )?)),
            // Unknown: everything before this message may be gone.
            None => Some(Mark {
                lsn: at.lsn,
                ordinal: at.ordinal - 1,
            }),
        })
    }

    fn header_position(
        &self,
        message: &async_nats::jetstream::Message,
        name: &str,
    ) -> Result<Option<Position>, StoreError> {
        let Some(headers) = message.headers.as_ref() else {
            return Ok(None);
        };
        match headers.get(SOURCE_HEADER) {
            Some(s) if s.as_str() == self.reader.source => {}
            _ => {
                return Err(StoreError::Corrupt {
                    position: format!("JetStream message on {}", message.subject),
                    message: format!("not an event of source {:?}", self.reader.source),
                })
            }
        }
        headers
            .get(name)
            .map(|v| {
                v.as_str()
                    .parse()
                    .map_err(|e: crate::event::ParsePositionError| StoreError::Corrupt {
                        position: format!("JetStream message on {}", message.subject),
                        message: format!("{name}: {e}"),
                    })
            })
            .transpose()
    }

    /// Fails unless every message the stream held when the follower started was read (or
    /// skipped as another table's): [`Follower::page`] takes a message the server did not
    /// deliver in time as discarded, which a reader that must see all of them (placing a
    /// snapshot) cannot assume. A transient error: asking again later may succeed.
    pub(crate) fn check_read_all(&self) -> Result<(), StoreError> {
        if self.next > self.stored_at_start {
            return Ok(());
        }
        Err(self.reader.request("read the messages around a snapshot")(
            format!(
                "the server holds messages up to sequence {} but delivered only up to {}",
                self.stored_at_start,
                self.next.saturating_sub(1)
            )
            .into(),
        ))
    }

    /// Until a message is there to read (returns at once when one is known to be).
    pub(crate) async fn wait(&mut self) -> Result<(), StoreError> {
        if self.peeked.is_some() || self.pending > 0 {
            return Ok(());
        }
        match self.messages.next().await {
            Some(Ok(m)) => {
                self.peeked = Some(m);
                Ok(())
            }
            Some(Err(e)) => Err(self.reader.request("read messages")(e.into())),
            None => Err(self.reader.request("read messages")(
                "the consumer ended".into(),
            )),
        }
    }
}
