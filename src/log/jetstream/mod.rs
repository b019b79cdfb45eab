//! The event log on NATS JetStream (`waltap run --nats-url`): every event appended to a
//! JetStream stream, exactly once and in commit order, across crashes of waltap.
//!
//! Owns the stream's layout (subjects, headers, body) and the append protocol. Invariants:
//!
//! - one source per JetStream stream: every message carries `Waltap-Source` (the slot),
//!   and a stream whose last message came from elsewhere is refused, not appended to;
//! - every publish carries `Nats-Expected-Last-Sequence`, the sequence the stream must end
//!   at for it to be stored: JetStream stores a session's messages only as an unbroken run
//!   after the end the session read at its start, so two writers (a deposed leader that
//!   woke up, a second process on the same stream) can never interleave or double events;
//!   the loser's publish is refused and it starts over from the new end;
//! - where the log ends is read from the stream itself (the last message's
//!   `Waltap-Position`), and an event at or before that position is not published again:
//!   a transaction cut in half by a crash is completed from its next event on;
//! - the slot is confirmed only after JetStream acknowledged every event of the
//!   transactions in a batch: the batch's last message (and one in every
//!   256) asks for an acknowledgement, and since each message names the
//!   sequence before it, an acknowledgement at the expected sequence proves that every
//!   message before it was stored, in order; a message lost or refused breaks the chain,
//!   and the next acknowledgement fails. `Nats-Msg-Id` (the event's id) is a second
//!   guard, for a message stored whose acknowledgement was lost;
//! - an initial state's watermark that passes while no event follows it (an idle source)
//!   is recorded in the key-value bucket `<stream>_progress` (key `<slot>.watermark`),
//!   once every message before it was acknowledged: the stream's last message and that
//!   mark together say which transactions the log holds (initial states wait on them). The
//!   writer also records its publication there (`<slot>.publication`), which bounds what
//!   an initial state copies.
//!
//! Subjects are `<prefix>.<schema>.<table>.<action>`, with schema and table escaped by
//! [`subject_token`] so that any Postgres identifier gives one valid subject token.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_nats::header::{HeaderMap, HeaderName, NATS_EXPECTED_LAST_SEQUENCE, NATS_MESSAGE_ID};
use async_nats::jetstream::context::{Context, PublishAckFuture};
use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::{ServerAddr, Subject};
use bytes::Bytes;

pub(crate) mod initial;
mod progress;
mod read;

pub(crate) use read::Follower;
pub use read::JetStreamReader;

use crate::event::{Event, Position};
use crate::log::{LogWriter, StoreError};
use crate::lsn::LogMark;

/// Header naming the source (the slot) whose events the stream holds.
pub const SOURCE_HEADER: &str = "Waltap-Source";
/// Header holding the event's position (its `position` field).
pub const POSITION_HEADER: &str = "Waltap-Position";
/// Header holding the position of the message before this one in the stream, or `none`
/// on the stream's first message: a reader that finds a gap in the sequences (the
/// stream's limits discarded messages) learns from it whether it missed an event.
/// Absent when the writer did not know (the stream's last message had been discarded
/// when it started).
pub const PREVIOUS_HEADER: &str = "Waltap-Previous";
/// Header set to `true` on the last event of each transaction (absent on the others),
/// so that a reader knows transaction boundaries without parsing bodies.
pub const TX_LAST_HEADER: &str = "Waltap-Tx-Last";
/// Header holding a table's new column layout (JSON) on the first event after its schema
/// changed, for waltap's own stream readers; the body stays what `waltap tail` prints.
pub const SCHEMA_CHANGE_HEADER: &str = "Waltap-Schema-Change";
// The header names as the client keeps them, made once (from a `&str` the client copies
// each name into every message's map).
const SOURCE: HeaderName = HeaderName::from_static(SOURCE_HEADER);
const POSITION: HeaderName = HeaderName::from_static(POSITION_HEADER);
const PREVIOUS: HeaderName = HeaderName::from_static(PREVIOUS_HEADER);
const TX_LAST: HeaderName = HeaderName::from_static(TX_LAST_HEADER);
const SCHEMA_CHANGE: HeaderName = HeaderName::from_static(SCHEMA_CHANGE_HEADER);

/// The value of [`PREVIOUS_HEADER`] on a stream's first message.
const PREVIOUS_NONE: &str = "none";

/// How long a publish may wait for JetStream's acknowledgement before the batch fails
/// (and the session restarts from the stream's end).
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// One publish in this many asks JetStream for an acknowledgement (and the last one of
/// every batch does): each message names the sequence before it, so an acknowledged
/// message proves that every message before it was stored in order. Asking for fewer
/// acknowledgements saves a reply subscription and a round of bookkeeping per event.
const ACK_EVERY: usize = 256;
/// Acknowledgements awaited before more is published: bounds what is in flight (and so
/// memory) for a transaction of any size.
const MAX_IN_FLIGHT: usize = 32;

/// Where and how to append: the servers, the stream, the subjects.
#[derive(Clone)]
#[non_exhaustive]
pub struct JetStreamConfig {
    /// The servers to connect to (any of them; credentials, if any, in the addresses).
    pub servers: Vec<ServerAddr>,
    /// The JetStream stream's name.
    pub stream: String,
    /// The first token(s) of every subject.
    pub subject_prefix: String,
    /// Replicas of the stream when waltap creates it (1 to 5).
    pub replicas: usize,
}

impl JetStreamConfig {
    /// Parses a comma-separated server list (`nats://host:4222,nats://other:4222`, user
    /// and password allowed in each) with the default stream `WALTAP`, prefix `waltap`
    /// and one replica.
    pub fn parse(urls: &str) -> Result<JetStreamConfig, JetStreamError> {
        let servers = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                ServerAddr::from_str(u).map_err(|e| JetStreamError::InvalidUrl {
                    // The parser's message never repeats the address (it may hold a password).
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if servers.is_empty() {
            return Err(JetStreamError::InvalidUrl {
                reason: "no server address given".into(),
            });
        }
        Ok(JetStreamConfig {
            servers,
            stream: "WALTAP".into(),
            subject_prefix: "waltap".into(),
            replicas: 1,
        })
    }

    /// Sets the stream name, checked: 1 to 64 of A-Z, a-z, 0-9, `_` and `-`.
    pub fn with_stream(mut self, name: &str) -> Result<Self, JetStreamError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(JetStreamError::InvalidName {
                what: "stream name",
                value: name.into(),
                rule: "use 1 to 64 characters of A-Z, a-z, 0-9, _ and -",
            });
        }
        self.stream = name.into();
        Ok(self)
    }

    /// Sets the subject prefix, checked: dot-separated tokens of printable ASCII without
    /// `*`, `>` or spaces.
    pub fn with_subject_prefix(mut self, prefix: &str) -> Result<Self, JetStreamError> {
        let ok = prefix.len() <= 128
            && prefix.split('.').all(|token| {
                !token.is_empty()
                    && token
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
            });
        if !ok {
            return Err(JetStreamError::InvalidName {
                what: "subject prefix",
                value: prefix.into(),
                rule: "use dot-separated tokens of printable ASCII without '*', '>' or spaces (e.g. waltap or cdc.prod)",
            });
        }
        self.subject_prefix = prefix.into();
        Ok(self)
    }

    /// Sets the replicas for a stream waltap creates (1 to 5, as JetStream allows).
    pub fn with_replicas(mut self, replicas: usize) -> Result<Self, JetStreamError> {
        if !(1..=5).contains(&replicas) {
            return Err(JetStreamError::InvalidName {
                what: "replica count",
                value: replicas.to_string(),
                rule: "JetStream streams have 1 to 5 replicas",
            });
        }
        self.replicas = replicas;
        Ok(self)
    }

    /// The servers without credentials, for logs and errors.
    pub fn describe(&self) -> String {
        let hosts: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("{}://{}:{}", s.scheme(), s.host(), s.port()))
            .collect();
        hosts.join(",")
    }

    /// Turns a client error of a request about the stream into [`JetStreamError::Request`].
    pub(crate) fn request_error(
        &self,
        operation: &'static str,
    ) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> JetStreamError + '_ {
        move |source| JetStreamError::Request {
            operation,
            stream: self.stream.clone(),
            source,
        }
    }

    /// The key-value bucket of what the writers record besides events.
    fn progress_bucket(&self) -> String {
        format!("{}_progress", self.stream)
    }

    /// The subjects waltap's stream takes: everything under the prefix.
    pub fn subjects(&self) -> String {
        format!("{}.>", self.subject_prefix)
    }
}

impl fmt::Debug for JetStreamConfig {
    // Never the addresses as given: they may carry a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamConfig")
            .field("servers", &self.describe())
            .field("stream", &self.stream)
            .field("subject_prefix", &self.subject_prefix)
            .field("replicas", &self.replicas)
            .finish()
    }
}

/// Failures of the JetStream log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JetStreamError {
    /// A `--nats-url` does not parse.
    #[error("invalid NATS server address: {reason}")]
    InvalidUrl {
        /// Why.
        reason: String,
    },
    /// A stream name, subject prefix or replica count is not allowed.
    #[error("invalid JetStream {what} {value:?}: {rule}")]
    InvalidName {
        /// Which setting.
        what: &'static str,
        /// What was given.
        value: String,
        /// What is allowed.
        rule: &'static str,
    },
    /// No server could be reached.
    #[error("cannot connect to NATS at {servers}")]
    Connect {
        /// The servers tried (without credentials).
        servers: String,
        /// The client's error.
        #[source]
        source: async_nats::ConnectError,
    },
    /// A JetStream API request failed (the server is unreachable, has no JetStream, or
    /// refused it).
    #[error("JetStream: cannot {operation} of stream {stream:?}")]
    Request {
        /// What the request was for.
        operation: &'static str,
        /// The stream.
        stream: String,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The stream exists but does not take waltap's subjects.
    #[error("JetStream stream {stream:?} takes the subjects {subjects:?}, not {wanted:?}: choose another --nats-stream, or add {wanted:?} to its subjects")]
    Subjects {
        /// The stream.
        stream: String,
        /// Its subjects.
        subjects: Vec<String>,
        /// The subjects waltap publishes to.
        wanted: String,
    },
    /// The stream's last message was not written by waltap for this source.
    #[error("JetStream stream {stream:?} ends with message {sequence}, which {reason}: a waltap stream holds the events of one source only; choose another --nats-stream")]
    Foreign {
        /// The stream.
        stream: String,
        /// The message's sequence.
        sequence: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A named stream reads another source than the JetStream log holds.
    #[error("JetStream stream {stream:?} holds the events of source {holds:?}, not {wanted:?}: a server with --nats-url serves the streams of its own --slot")]
    OtherSource {
        /// The JetStream stream.
        stream: String,
        /// The source it holds.
        holds: String,
        /// The source asked for.
        wanted: String,
    },
    /// The stream's limits discarded every message, so where the log ends is unknown.
    #[error("every message of the JetStream log of source {slot:?} was discarded by the stream's limits, so where it ends is unknown: create or reset the stream once the next change is appended (it then delivers what comes after that change)")]
    EndUnknown {
        /// The source (slot).
        slot: String,
    },
    /// The stream's limits discarded events an initial state's snapshot is placed among.
    #[error("the JetStream log of source {slot:?} lost events right after an initial state's snapshot to the stream's limits (max_msgs, max_bytes, max_age), so the snapshot cannot be placed among them: raise the limits, then reset the stream")]
    SnapshotGap {
        /// The source (slot).
        slot: String,
    },
    /// A publish was not acknowledged.
    #[error("JetStream did not store event {position}")]
    Publish {
        /// The event's position.
        position: Position,
        /// The client's error.
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
    /// JetStream stored an event at another sequence than this session expected, or
    /// found it a duplicate: something else appended since the session read the end.
    #[error("JetStream stream {stream:?} moved under this writer: event {position} got sequence {got} (duplicate: {duplicate}), expected {expected}; starting again from the stream's end")]
    Moved {
        /// The stream.
        stream: String,
        /// The event's position.
        position: Position,
        /// The sequence the session expected.
        expected: u64,
        /// The sequence JetStream reported.
        got: u64,
        /// Whether JetStream reported it as a duplicate.
        duplicate: bool,
    },
}

impl JetStreamError {
    /// Whether retrying later can help: connection trouble, a stream leader being
    /// elected, a writer that moved the end. Settings that do not fit are definite.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            JetStreamError::Connect { .. }
                | JetStreamError::Request { .. }
                | JetStreamError::Publish { .. }
                | JetStreamError::Moved { .. }
        )
    }
}

/// Appends `name` to `out` as one subject token: ASCII letters, digits, `_` and `-` stay,
/// every other byte of its UTF-8 form becomes `%` and two uppercase hex digits (so `%`
/// itself is `%25`, `.` is `%2E`, a space `%20`). The mapping is one-to-one, and a
/// subscriber that knows a table's name can compute its subject.
pub fn subject_token(name: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xF)]));
        }
    }
}

/// The subject of an event: `<prefix>.<schema>.<table>.<action>`.
pub fn subject(prefix: &str, schema: &str, table: &str, action: &str, out: &mut String) {
    out.clear();
    out.push_str(prefix);
    out.push('.');
    subject_token(schema, out);
    out.push('.');
    subject_token(table, out);
    out.push('.');
    out.push_str(action);
}

/// A JetStream context on a new connection to `config`'s servers.
async fn connect(config: &JetStreamConfig, name: &str) -> Result<Context, JetStreamError> {
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .connect(config.servers.as_slice())
        .await
        .map_err(|source| JetStreamError::Connect {
            servers: config.describe(),
            source,
        })?;
    Ok(async_nats::jetstream::ContextBuilder::new()
        .ack_timeout(ACK_TIMEOUT)
        .build(client))
}

/// The stream, created when missing; refused when it does not take waltap's subjects.
async fn ensure_stream(
    js: &Context,
    config: &JetStreamConfig,
) -> Result<async_nats::jetstream::stream::Stream, JetStreamError> {
    let request = |operation| config.request_error(operation);
    let mut stream = js
        .get_or_create_stream(StreamConfig {
            name: config.stream.clone(),
            subjects: vec![config.subjects()],
            num_replicas: config.replicas,
            storage: StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| request("look up or create the stream")(e.into()))?;
    let info = stream
        .info()
        .await
        .map_err(|e| request("read the state")(e.into()))?;
    let wanted = config.subjects();
    if !info
        .config
        .subjects
        .iter()
        .any(|s| *s == wanted || s == ">")
    {
        return Err(JetStreamError::Subjects {
            stream: config.stream.clone(),
            subjects: info.config.subjects.clone(),
            wanted,
        });
    }
    Ok(stream)
}

/// One session's writer: connected, the stream ensured, the end known.
pub struct JetStreamLog {
    js: Context,
    config: JetStreamConfig,
    source: String,
    /// The last event in the stream, as read at the start.
    end: Option<Position>,
    /// The stream's last message as far as this session knows: `Some(None)` while the
    /// stream is empty, `None` when its last message was discarded before the start.
    previous: Option<Option<Position>>,
    /// The sequence the stream ends at once everything published is stored.
    last_sequence: u64,
    /// Publishes whose acknowledgement is awaited: (the sequence expected, the event, the
    /// ack).
    in_flight: VecDeque<(u64, Position, PublishAckFuture)>,
    /// The newest message, not yet sent: whether it asks for an acknowledgement depends on
    /// whether it turns out to be the batch's last.
    held: Option<Outgoing>,
    /// Messages sent since the last one that asked for an acknowledgement.
    unacked: usize,
    body: Vec<u8>,
    subject: String,
    /// The last subject published to, shared by the messages of a run of events of one
    /// table and action instead of a copy each.
    last_subject: Option<Subject>,
    /// The progress bucket, once something was recorded in it.
    recorded: Option<kv::Store>,
    /// The last watermark mark recorded by this session.
    marked: LogMark,
}

impl JetStreamLog {
    /// Connects, creates the stream when it is missing, and reads where it ends.
    pub async fn open(config: &JetStreamConfig, source: &str) -> Result<Self, JetStreamError> {
        let js = connect(config, &format!("waltap {source}")).await?;
        let stream = ensure_stream(&js, config).await?;
        let request = |operation| config.request_error(operation);
        // Read by `ensure_stream` just now.
        let info = stream.cached_info();
        let last_sequence = info.state.last_sequence;
        let end = if last_sequence == 0 {
            None
        } else {
            match stream.get_raw_message(last_sequence).await {
                Ok(message) => Some(Self::position_of(config, source, &message)?),
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                {
                    // The stream's limits removed its last message: where the log ends is
                    // no longer known from the stream, so the slot's confirmed position is
                    // all there is (the Nats-Msg-Id window still catches a recent replay).
                    tracing::warn!(stream = %config.stream, sequence = last_sequence, "the stream's last message was removed by its limits: resuming from the slot's confirmed position");
                    None
                }
                Err(e) => return Err(request("read the last message")(e.into())),
            }
        };
        let previous = match (last_sequence, end) {
            (0, _) => Some(None),
            (_, Some(end)) => Some(Some(end)),
            (_, None) => None,
        };
        Ok(JetStreamLog {
            js,
            config: config.clone(),
            source: source.to_owned(),
            end,
            previous,
            last_sequence,
            in_flight: VecDeque::with_capacity(MAX_IN_FLIGHT),
            held: None,
            unacked: 0,
            body: Vec::with_capacity(1024),
            subject: String::with_capacity(128),
            last_subject: None,
            recorded: None,
            marked: LogMark::NONE,
        })
    }

    fn position_of(
        config: &JetStreamConfig,
        source: &str,
        message: &async_nats::jetstream::message::StreamMessage,
    ) -> Result<Position, JetStreamError> {
        let foreign = |reason: String| JetStreamError::Foreign {
            stream: config.stream.clone(),
            sequence: message.sequence,
            reason,
        };
        let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
        match header(SOURCE_HEADER) {
            Some(s) if s == source => {}
            Some(other) => return Err(foreign(format!("holds events of source {other:?}"))),
            None => return Err(foreign(format!("has no {SOURCE_HEADER} header"))),
        }
        let text = header(POSITION_HEADER)
            .ok_or_else(|| foreign(format!("has no {POSITION_HEADER} header")))?;
        text.parse()
            .map_err(|e: crate::event::ParsePositionError| foreign(e.to_string()))
    }

    /// Forgets what is in flight after a failure: the session ends, and the next one
    /// starts from the stream's end.
    fn abandon(&mut self) {
        self.in_flight.clear();
        self.held = None;
    }

    /// Waits for the oldest acknowledgements until at most `keep` publishes are in flight.
    async fn settle(&mut self, keep: usize) -> Result<(), JetStreamError> {
        while self.in_flight.len() > keep {
            let Some((expected, position, ack)) = self.in_flight.pop_front() else {
                break;
            };
            let result = ack.await;
            let ack = match result {
                Ok(ack) => ack,
                Err(source) => {
                    self.abandon();
                    return Err(JetStreamError::Publish { position, source });
                }
            };
            if ack.sequence != expected || ack.duplicate {
                self.abandon();
                return Err(JetStreamError::Moved {
                    stream: self.config.stream.clone(),
                    position,
                    expected,
                    got: ack.sequence,
                    duplicate: ack.duplicate,
                });
            }
        }
        Ok(())
    }

    async fn publish(&mut self, ev: &Event) -> Result<(), JetStreamError> {
        subject(
            &self.config.subject_prefix,
            &ev.schema,
            &ev.table,
            ev.action_name(),
            &mut self.subject,
        );
        self.body.clear();
        ev.write_json(&mut self.body)
            .map_err(|e| JetStreamError::Request {
                operation: "serialize an event",
                stream: self.config.stream.clone(),
                source: e.into(),
            })?;
        let mut id = [0u8; ulid::ULID_LEN];
        let mut position = [0u8; crate::event::POSITION_LEN];
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, &*ev.id.array_to_str(&mut id));
        headers.insert(
            NATS_EXPECTED_LAST_SEQUENCE,
            itoa::Buffer::new().format(self.last_sequence),
        );
        headers.insert(POSITION, ev.position.encode(&mut position));
        headers.insert(SOURCE, self.source.as_str());
        match self.previous {
            Some(Some(p)) => headers.insert(PREVIOUS, p.encode(&mut position)),
            Some(None) => headers.insert(PREVIOUS, PREVIOUS_NONE),
            None => {}
        }
        self.previous = Some(Some(ev.position));
        if ev.tx.last {
            headers.insert(TX_LAST, "true");
        }
        if let Some(change) = &ev.schema_change {
            let text = change.stored_json().map_err(|e| JetStreamError::Request {
                operation: "serialize a schema change",
                stream: self.config.stream.clone(),
                source: e.into(),
            })?;
            headers.insert(SCHEMA_CHANGE, text.as_str());
        }
        self.last_sequence += 1;
        let next = Outgoing {
            subject: match &self.last_subject {
                Some(last) if last.as_str() == self.subject => last.clone(),
                _ => self
                    .last_subject
                    .insert(Subject::from(self.subject.as_str()))
                    .clone(),
            },
            headers,
            payload: Bytes::copy_from_slice(&self.body),
            position: ev.position,
            sequence: self.last_sequence,
        };
        if let Some(previous) = self.held.replace(next) {
            let ack = self.unacked + 1 >= ACK_EVERY;
            self.send(previous, ack).await?;
        }
        Ok(())
    }

    /// Sends a message, asking for an acknowledgement or not.
    async fn send(&mut self, message: Outgoing, ack: bool) -> Result<(), JetStreamError> {
        let publish_error = |source| JetStreamError::Publish {
            position: message.position,
            source,
        };
        if !ack {
            self.js
                .client()
                .publish_with_headers(message.subject, message.headers, message.payload)
                .await
                .map_err(|e| {
                    publish_error(async_nats::jetstream::context::PublishError::with_source(
                        async_nats::jetstream::context::PublishErrorKind::BrokenPipe,
                        e,
                    ))
                })?;
            self.unacked += 1;
            return Ok(());
        }
        let future = self
            .js
            .send_publish(
                message.subject,
                PublishMessage::build()
                    .payload(message.payload)
                    .headers(message.headers),
            )
            .await
            .map_err(publish_error)?;
        self.unacked = 0;
        self.in_flight
            .push_back((message.sequence, message.position, future));
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            self.settle(MAX_IN_FLIGHT / 2).await?;
        }
        Ok(())
    }
}

/// A message built but not yet sent.
struct Outgoing {
    subject: Subject,
    headers: HeaderMap,
    payload: Bytes,
    position: Position,
    /// The sequence it gets when stored.
    sequence: u64,
}

impl LogWriter for JetStreamLog {
    async fn progress(&mut self) -> Result<Option<LogMark>, StoreError> {
        // A stream cut inside a transaction holds part of it: the mark covers only the
        // transactions before it, and `end` says which of its events are in.
        Ok(self.end.map(|p| {
            if p.commit_lsn.0 == 0 {
                LogMark::NONE
            } else {
                LogMark::from_stored(crate::lsn::Lsn(p.commit_lsn.0 - 1))
            }
        }))
    }

    async fn write(&mut self, events: &[Event]) -> Result<(), StoreError> {
        for ev in events {
            self.publish(ev).await?;
        }
        Ok(())
    }

    async fn last_event(&mut self) -> Result<Option<Position>, StoreError> {
        Ok(self.end)
    }

    async fn commit(&mut self, through: LogMark) -> Result<(), StoreError> {
        // The stream's last message is the mark (past it, a watermark's in the bucket). The
        // batch's last message asks for an acknowledgement, which covers all before it.
        if let Some(last) = self.held.take() {
            self.send(last, true).await?;
        }
        self.settle(0).await?;
        // A mark past the last message's transaction came from a watermark: no message
        // says that the log is complete up to it, so the bucket does (for a snapshot
        // waiting on an idle source). Every message before it is acknowledged by now.
        let by_messages = self
            .previous
            .flatten()
            .map(|p| LogMark::through_commit(p.commit_lsn));
        if Some(through) > by_messages && through > self.marked {
            self.record_mark(through).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(name: &str) -> String {
        let mut out = String::new();
        subject_token(name, &mut out);
        out
    }

    #[test]
    fn plain_names_stay_and_everything_else_is_escaped() {
        assert_eq!(token("orders"), "orders");
        assert_eq!(token("Order_Items-2"), "Order_Items-2");
        assert_eq!(token("a.b"), "a%2Eb");
        assert_eq!(token("a b*>"), "a%20b%2A%3E");
        assert_eq!(token("100%"), "100%25");
        assert_eq!(token("größe"), "gr%C3%B6%C3%9Fe");
        assert_eq!(token("$x\t"), "%24x%09");
    }

    #[test]
    fn escaping_is_one_to_one() {
        let names = ["a.b", "a%2Eb", "a%b", "a_b", "a-b", "a b", "ab", "a\u{2e}b"];
        let mut seen = std::collections::HashMap::new();
        for n in names {
            if let Some(other) = seen.insert(token(n), n) {
                assert_eq!(other, n, "{other:?} and {n:?} share a token");
            }
        }
    }

    #[test]
    fn subjects_put_the_tokens_in_order() {
        let mut s = String::new();
        subject("cdc.prod", "public", "my table", "update", &mut s);
        assert_eq!(s, "cdc.prod.public.my%20table.update");
    }

    #[test]
    fn settings_are_checked() {
        let c = JetStreamConfig::parse("nats://user:secret@127.0.0.1:4222, nats://b:5222")
            .expect("parses");
        assert_eq!(c.describe(), "nats://127.0.0.1:4222,nats://b:5222");
        assert!(!format!("{c:?}").contains("secret"));
        assert!(c.clone().with_stream("CDC_1").is_ok());
        assert!(c.clone().with_stream("a.b").is_err());
        assert!(c.clone().with_stream("").is_err());
        assert!(c.clone().with_subject_prefix("cdc.prod").is_ok());
        assert!(c.clone().with_subject_prefix("cdc.*").is_err());
        assert!(c.clone().with_subject_prefix("cdc..x").is_err());
        assert!(c.clone().with_subject_prefix("").is_err());
        assert!(c.clone().with_replicas(3).is_ok());
        assert!(c.clone().with_replicas(0).is_err());
        assert!(JetStreamConfig::parse(" , ").is_err());
    }
}
